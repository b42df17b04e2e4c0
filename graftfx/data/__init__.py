from .digits import DIGITS_CONFIG, digits_dataset, digits_split

__all__ = ["digits_dataset", "digits_split", "DIGITS_CONFIG"]
