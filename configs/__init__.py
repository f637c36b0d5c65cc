"""Named presets: each module defines CONFIG (a jaxlm.config.Config). See jaxlm.config.load_preset."""
