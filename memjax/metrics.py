"""python -m memjax.metrics (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.metrics import main

if __name__ == "__main__":
  cli.run_main(main)
