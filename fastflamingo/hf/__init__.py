"""Routes from transformers into fastflamingo: ``load`` (drop-ins transformers builds itself at load time),
``hub`` and ``hub_layers`` (the layers as a Hugging Face kernel repository)."""
