"""bitsmith.export"""
