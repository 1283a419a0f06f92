"""A handler that does nothing: what remains of a request is the platform's own cost."""


from typing import Any


def noop(event: Any, context: Any) -> None:
    return None
