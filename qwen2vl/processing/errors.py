"""The one error type of input preparation: it names the item and the problem."""


class InputError(ValueError):
    """A conversation item (image, video, text) cannot be prepared; the message says which and why."""

    def __init__(self, message: str, item: str | None = None) -> None:
        super().__init__(f"{item}: {message}" if item else message)
        self.item = item
