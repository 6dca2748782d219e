"""conversation-continuation: the `convo` command and the project-wide error family."""

__version__ = "0.1.0"
