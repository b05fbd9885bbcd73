"""Export of trained models to recurrent step graphs (ONNX Runtime, TorchScript, torch.export)."""
