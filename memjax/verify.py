"""python -m memjax.verify (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.verify import main

if __name__ == "__main__":
  cli.run_main(main)
