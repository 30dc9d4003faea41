"""The long-running process and the command line: the one place that wires model and streams."""
