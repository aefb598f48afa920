"""The language model: loading it (models), naming its layers and hooking them (sites), batched decoding (decoding)."""
