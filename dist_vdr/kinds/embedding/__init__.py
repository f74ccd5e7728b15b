"""kinds/embedding."""
