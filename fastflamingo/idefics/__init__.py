"""Drop-in modules for Hugging Face IDEFICS (transformers ``models/idefics``)."""
from .layer import *  # noqa: F401,F403
from .layer import __all__  # noqa: F401
