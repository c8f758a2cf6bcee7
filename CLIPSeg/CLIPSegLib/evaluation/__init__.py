"""Judging a model on labelled data: the evaluator over phantom or labelled cases (``evaluator``), the metrics
(``metrics``, MONAI) and the reports (``reports``)."""
