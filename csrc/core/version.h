#pragma once
// The single source of pgext's version: setup.py and CMakeLists.txt read it.
#define PGEXT_VERSION "0.1.0"
