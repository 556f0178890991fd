"""The web service: REST API and web page over the models in one folder (see `app`)."""
