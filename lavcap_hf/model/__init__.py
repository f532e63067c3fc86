"""The model set: configuration, modelling, processing, feature extraction, the pipeline and the media decoding they
need. It is exactly what a saved model folder carries as remote code (loaded with `trust_remote_code=True` where this
package is not installed), so its modules import one another with single-dot imports only, and nothing from the rest
of the package."""
