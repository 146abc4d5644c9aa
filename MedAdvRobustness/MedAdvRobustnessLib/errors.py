"""The one error type for bad user input: its message is shown to the user as is."""


class InputError(ValueError):
    """Bad input (file, node, model, parameter), with a message that says what is wrong."""
