"""python -m memjax.crosscheck (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.crosscheck import main

if __name__ == "__main__":
  cli.run_main(main)
