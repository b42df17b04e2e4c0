from .digits import DIGITS_CONFIG, digits_dataset, digits_split
from .encode import encode_captions, encode_latents, load_caption_embeddings, load_latents

__all__ = ["digits_dataset", "digits_split", "DIGITS_CONFIG", "encode_latents", "encode_captions", "load_latents",
           "load_caption_embeddings"]
