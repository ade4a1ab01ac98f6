"""Vision-language-model policies: the chat layer, backends and the tiny from-scratch model.

`agents.vlm.chat` needs only numpy; `agents.vlm.tiny` imports torch and transformers and
registers the tiny model with the transformers Auto classes on import.
"""
