"""Config files and their defaults."""
