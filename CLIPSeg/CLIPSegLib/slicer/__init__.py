"""Everything the Slicer module calls that needs no Qt: volume and segment nodes (``mrml_bridge``), one run on a
volume node (``scene_run``) in a background process (``background``), and the Python packages it needs
(``dependencies``, standard library only)."""
