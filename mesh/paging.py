"""The page-size contract of ListConversations.

The gateway checks it before forwarding a request and the persister checks it again when it serves
one (it is reachable without the gateway), so the limits and the error live here, once.
"""

from __future__ import annotations

from mesh.errors import InvalidArgument

MAX_PAGE_SIZE = 100
# What a page_size of 0 means.
DEFAULT_PAGE_SIZE = 20


def validate_page_size(page_size: int) -> None:
    """Raise INVALID_ARGUMENT (reason ``PAGE_SIZE_OUT_OF_RANGE``) outside 0..``MAX_PAGE_SIZE``."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 0 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}); "
            f"got {page_size}",
            reason="PAGE_SIZE_OUT_OF_RANGE",
            field="page_size",
        )
