"""Config tree, Ray actors, weight sync, the driver loop, reports and the command line."""
