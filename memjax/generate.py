"""python -m memjax.generate (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.generate import main

if __name__ == "__main__":
  cli.run_main(main)
