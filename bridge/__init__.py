"""streamdiffusion-bridge: live StreamDiffusion for VJ rigs."""

__version__ = "0.1.0"
