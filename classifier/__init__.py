from classifier.loading import GateClassifier, load_classifier

__all__ = ["GateClassifier", "load_classifier"]
