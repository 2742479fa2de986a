"""python -m memjax.metrics: precision@K, ROC AUC, TPR@1%FPR (both conventions) and
TPR@0.1%FPR of every detector column, per memorization type.

    python -m memjax.metrics --scores=WORKDIR --labels=TABLE_OR_WORKDIR \\
      [--label_column=overfit_type] [--positive=MV,RV,TV] [--k_list=10,100,500] \\
      [--score_columns=EXTRA,...] [--out=FILE.json | --workdir=DIR --name=NAME]

Every detector column present is scored (metrics.DEFAULT_SCORE_COLUMNS: scores,
wen, wen981, jeon, asthana, asthana_norm, asthana_cos, ren_le, edge_scores, and
the generate stage's wen_steps, bright_ending as their means over each prompt's
seeds); --score_columns adds others (each must exist). A column scored on fewer
prompts than the widest (e.g. the regenerated top K) is marked '*' and noted.

docs/method.md section 8 (`memjax.stages.metrics`, `memjax.method.detection`).
"""
from memjax.cli import command
from memjax.cli.options import Opt
from memjax.stages import metrics

OPTIONS = [
    Opt("scores", "Workdir(s) (their scan, blackbox and generate tables) or score table(s)."),
    Opt("labels", "Label table, or a workdir (its verify labels)."),
    Opt("label_column", "Label column (MV|RV|TV|N)."),
    Opt("positive", "Labels that count as memorized."),
    Opt("k_list", "K values of precision@K."),
    Opt("score_columns", "Extra score columns, scored beside every detector column present "
        "(" + ",".join(metrics.DEFAULT_SCORE_COLUMNS) + "); each must exist."),
    Opt("prompt_column", "Caption column, to join on captions when the labels have no ids."),
    Opt("out", "Write the JSON report to this file."),
    Opt("workdir", "Write the JSON report to WORKDIR/metrics/<name>.json (with a manifest)."),
    Opt("name", "The report's name in WORKDIR/metrics/."),
]
define, build = command.simple(metrics.MetricsConfig, OPTIONS)


def summary(report) -> str:
  return metrics.format_table(report)


if __name__ == "__main__":
  command.main(define, build, metrics.run, summary, devices=False)
