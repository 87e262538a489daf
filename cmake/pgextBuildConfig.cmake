# Reads pgext's compiler flags and default CUDA architectures from
# pgext/_build_config.py, the build description that setup.py and the JIT
# loader use, so that the three builds cannot drift apart. Python is not run:
# the list literals are parsed.
#
# Defines:
#   PGEXT_CXX_FLAGS               CXX_FLAGS without -O* and -std=* (CMake's
#                                 build type and CXX_STANDARD own those)
#   PGEXT_NVCC_FLAGS              NVCC_FLAGS, likewise
#   PGEXT_LINK_FLAGS              LINK_FLAGS (-fopenmp)
#   PGEXT_DEFAULT_CUDA_ARCH_LIST  DEFAULT_CUDA_ARCH_LIST ("8.0;9.0+PTX")
#   pgext_cuda_architectures(<out> <torch arch list>)
#                                 "8.0;9.0+PTX" -> "80-real;90" for the
#                                 CUDA_ARCHITECTURES target property

set(_pgext_build_config "${CMAKE_CURRENT_LIST_DIR}/../pgext/_build_config.py")
file(READ "${_pgext_build_config}" _pgext_build_config_text)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_pgext_build_config}")

# _pgext_py_list(<out> <NAME>): the string items of `NAME = ["a", "b", ...]`.
function(_pgext_py_list out name)
  string(REGEX MATCH "\n${name} = \\[([^]]*)\\]" _m "${_pgext_build_config_text}")
  if(NOT _m)
    message(FATAL_ERROR "pgext: no `${name} = [...]` in ${_pgext_build_config}")
  endif()
  string(REGEX MATCHALL "\"[^\"]*\"" _items "${CMAKE_MATCH_1}")
  set(_result "")
  foreach(_item IN LISTS _items)
    string(REGEX REPLACE "^\"(.*)\"$" "\\1" _item "${_item}")
    if(NOT _item MATCHES "^-O" AND NOT _item MATCHES "^-std=")
      list(APPEND _result "${_item}")
    endif()
  endforeach()
  set(${out} "${_result}" PARENT_SCOPE)
endfunction()

_pgext_py_list(PGEXT_CXX_FLAGS CXX_FLAGS)
_pgext_py_list(PGEXT_NVCC_FLAGS NVCC_FLAGS)
_pgext_py_list(PGEXT_LINK_FLAGS LINK_FLAGS)

string(REGEX MATCH "\nDEFAULT_CUDA_ARCH_LIST = \"([^\"]*)\"" _m "${_pgext_build_config_text}")
if(NOT _m)
  message(FATAL_ERROR "pgext: no DEFAULT_CUDA_ARCH_LIST in ${_pgext_build_config}")
endif()
set(PGEXT_DEFAULT_CUDA_ARCH_LIST "${CMAKE_MATCH_1}")

# torch's TORCH_CUDA_ARCH_LIST syntax ("7.5 8.0;9.0a+PTX") to CMake's: an
# architecture gets SASS ("-real"); "+PTX" adds its PTX as well.
function(pgext_cuda_architectures out arch_list)
  string(REPLACE " " ";" arch_list "${arch_list}")
  set(_result "")
  foreach(_arch IN LISTS arch_list)
    if(_arch STREQUAL "")
      continue()
    endif()
    if(NOT _arch MATCHES "^([0-9]+)\\.([0-9]+)([a-z]?)(\\+PTX)?$")
      message(FATAL_ERROR "pgext: cannot read CUDA architecture '${_arch}' "
                          "(expected e.g. 8.0, 9.0a or 9.0+PTX)")
    endif()
    set(_sm "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if(CMAKE_MATCH_4)
      list(APPEND _result "${_sm}")  # SASS and PTX
    else()
      list(APPEND _result "${_sm}-real")
    endif()
  endforeach()
  set(${out} "${_result}" PARENT_SCOPE)
endfunction()
