"""python -m memjax.train (temporary shim during the restructure)."""
from memjax import cli
from memjax.testing.training import main

if __name__ == "__main__":
  cli.run_main(main)
