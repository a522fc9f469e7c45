"""The pipeline's stages as thin click commands over plain ``run(config) -> result`` functions."""
