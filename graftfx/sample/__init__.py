"""``graftfx sample``: images (PNGs and a grid) from a diffusers pipeline whose transformer is a
grafted one (or its base), with optional real FID; see ``graftfx.sample.sample``."""
from .sample import (load_embeddings, load_native, load_pipeline, load_vae, pipeline_kind, sample_images,
                     sample_native, write_images)

__all__ = ["load_pipeline", "sample_images", "write_images", "load_embeddings", "pipeline_kind", "load_native",
           "sample_native", "load_vae"]
