"""bitsmith.models"""
