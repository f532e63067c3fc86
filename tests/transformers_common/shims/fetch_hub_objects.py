"""Stands in for transformers' CI helper `utils/fetch_hub_objects_for_ci.py`, which the sdist does not ship (5.x's
`test_processing_common` imports it by that top-level name)."""


def url_to_local_path(url: str, return_url_if_not_found: bool = True) -> str:
    """The URL itself: nothing is prefetched here (the CI helper maps URLs to files it downloaded beforehand)."""
    return url
