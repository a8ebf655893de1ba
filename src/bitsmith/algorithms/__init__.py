"""bitsmith.algorithms"""
