"""Teaching a model: the one training loop (``loop``), training data (``datasets``), each engine's recipe
(``cliptnseg_recipe``) and the calibration of the found / not-found rule from labelled data (``calibration``)."""
