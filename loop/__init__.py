"""The closed loop: configuration, the controller, presentation, session recording and the CLI."""
