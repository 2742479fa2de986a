"""python -m memjax.report: the HTML report of a workdir.

    python -m memjax.report --workdir=DIR [--top_k=K]

Summary, metrics, plots and a gallery of the top K, in WORKDIR/report/index.html
(opens from disk; `memjax.stages.report`).
"""
from memjax.cli import command
from memjax.cli.options import Opt
from memjax.stages import report

OPTIONS = [
    Opt("workdir", "The workdir whose stages to report."),
    Opt("top_k", "Gallery size (default: the scan's top_k)."),
    Opt("k_list", "K values of precision@K in the tables."),
]
define, build = command.simple(report.ReportConfig, OPTIONS)


def summary(m) -> str:
  return "\n".join([f"missing: {item}" for item in m.details["missing"]] +
                   [f"report: {m.details['path']}"])


if __name__ == "__main__":
  command.main(define, build, report.run, summary, devices=False)
