"""From a volume and prompts to masks: intensity and slice preparation (``preprocessing``), the slice pipeline with
the engine (``pipeline``), the found / not-found decision (``postprocess``), the training-domain check (``domain``),
and file in / file out (``segment_file``)."""
