"""Device meshes and the one table that maps the model's logical axes onto mesh axes."""
