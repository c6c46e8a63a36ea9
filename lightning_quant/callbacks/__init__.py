"""Lightning callbacks: thin adapters over the core functions in quantization/, export/ and benchmark."""
