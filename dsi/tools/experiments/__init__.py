"""Experiments: the offline simulator (``dsi simulate``), the online benchmark
(``dsi bench``), experiment files and the plots they produce."""
