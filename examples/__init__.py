"""Runnable example apps that use replica-router as a user would."""
