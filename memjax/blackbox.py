"""python -m memjax.blackbox (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.blackbox import main

if __name__ == "__main__":
  cli.run_main(main)
