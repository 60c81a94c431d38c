"""retina-batch: retinal vessel segmentation for whole folders of fundus photographs."""

__version__ = "0.1.0"


def segment(*args, **kwargs):
    """Segment a folder tree, image or list file; see retina_batch.pipeline.segment."""
    from .pipeline import segment as run

    return run(*args, **kwargs)
