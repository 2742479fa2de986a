"""python -m memjax.report (temporary shim during the restructure)."""
from memjax import cli
from memjax.stages.report import main

if __name__ == "__main__":
  cli.run_main(main)
