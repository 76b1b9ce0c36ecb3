"""The tasks: prune, distill, analyze, eval-mask, export, and the settings they parse."""
