"""Files in and out: the internal layout and geometry (``geometry``), reading images (``read``), writing results
and reading them back (``outputs``), the supported formats (``formats``), the user's CSV tables (``tables``)."""
