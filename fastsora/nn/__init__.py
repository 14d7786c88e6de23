"""Drop-in nn.Modules backed by fastsora's ops."""
