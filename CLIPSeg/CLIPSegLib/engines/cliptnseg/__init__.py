"""CLIP-TNseg (Sun et al., IEEE SPL 2025): the network (``network``) and the engine behind the contract
(``engine``)."""
