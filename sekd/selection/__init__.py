"""The three selection axes: positions (signals + policies), classes, samples; and the criteria D."""
