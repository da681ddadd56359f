"""The browser app (gradio): the model hub, the inspector tab and the PassKey tab."""
