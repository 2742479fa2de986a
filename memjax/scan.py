"""python -m memjax.scan (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.scan import main

if __name__ == "__main__":
  cli.run_main(main)
