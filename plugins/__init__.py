"""Built-in families. Each module is a plugin registered through the ``lrnnx_zoo`` entry point
group, exactly as a third-party package would register its own."""
